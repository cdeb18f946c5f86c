{{/* Names. <fullname> is the release name when it already contains "ephemera". */}}
{{- define "ephemera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ephemera.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ephemera.controller.fullname" -}}
{{- printf "%s-controller" (include "ephemera.fullname" .) }}
{{- end }}

{{- define "ephemera.webhook.fullname" -}}
{{- printf "%s-webhook" (include "ephemera.fullname" .) }}
{{- end }}

{{/* Name of both webhook configurations (`--webhook-configuration`). */}}
{{- define "ephemera.webhookConfiguration" -}}
{{- include "ephemera.fullname" . }}
{{- end }}

{{- define "ephemera.tlsSecret" -}}
{{- default (printf "%s-webhook-certs" (include "ephemera.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{/* The Secret an earlier release's webhook made for itself (tls.adoptFrom). */}}
{{- define "ephemera.tlsSecretAdoptFrom" -}}
{{- $from := default (printf "%s-webhook-tls" (include "ephemera.fullname" .)) .Values.tls.adoptFrom }}
{{- if eq $from (include "ephemera.tlsSecret" .) }}
{{- fail "tls.adoptFrom must differ from tls.secretName: the chart owns tls.secretName, and an earlier release's webhook made tls.adoptFrom" }}
{{- end }}
{{- $from }}
{{- end }}

{{/* cert-manager: the Secret of the serving Certificate. */}}
{{- define "ephemera.certManagerSecret" -}}
{{- printf "%s-webhook-cert" (include "ephemera.fullname" .) }}
{{- end }}

{{- define "ephemera.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "ephemera.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ephemera.webhook.serviceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create }}
{{- default (include "ephemera.webhook.fullname" .) .Values.webhook.serviceAccount.name }}
{{- else }}
{{- required "webhook.serviceAccount.name is required when webhook.serviceAccount.create is false" .Values.webhook.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels. */}}
{{- define "ephemera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ephemera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ephemera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ephemera.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ephemera
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "controller"). */}}
{{- define "ephemera.componentLabels" -}}
{{ include "ephemera.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ephemera.componentSelector" -}}
{{ include "ephemera.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ephemera.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Environment shared by both components. */}}
{{- define "ephemera.env" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: EPHEMERA_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.aws.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.aws.region | quote }}
- name: AWS_STS_REGIONAL_ENDPOINTS
  value: regional
{{- with .Values.aws.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Flags shared by both components (CloudArgs). */}}
{{- define "ephemera.cloudArgs" -}}
- --cluster-name={{ .Values.clusterName }}
- --aws-partition={{ .Values.aws.partition }}
- --role-path-root={{ .Values.aws.rolePathRoot }}
{{- with .Values.aws.accountId }}
- --aws-account-id={{ . }}
{{- end }}
{{- with .Values.oidcIssuer }}
- --oidc-issuer={{ . }}
{{- end }}
{{- end }}

{{/* Namespaces no webhook configuration may ever select. */}}
{{- define "ephemera.excludedNamespaces" -}}
{{- $excluded := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace }}
{{- range .Values.webhook.excludedNamespaces }}
{{- if not (has . $excluded) }}
{{- $excluded = append $excluded . }}
{{- end }}
{{- end }}
{{- toJson $excluded }}
{{- end }}

{{/* The namespaceSelector of both webhooks: the exclusions, ANDed with the user's selector. */}}
{{- define "ephemera.webhookNamespaceSelector" -}}
{{- $own := or .Values.webhook.namespaceSelector.matchLabels .Values.webhook.namespaceSelector.matchExpressions }}
{{- if and (not $own) (not .Values.webhook.allNamespaces) -}}
matchLabels:
  ephemera.dev/governed: "true"
{{ end -}}
{{- with .Values.webhook.namespaceSelector.matchLabels -}}
matchLabels:
  {{- toYaml . | nindent 2 }}
{{ end -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: {{ include "ephemera.excludedNamespaces" . }}
{{- with .Values.webhook.namespaceSelector.matchExpressions }}
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Preferred anti-affinity: replicas of one component on different nodes. */}}
{{- define "ephemera.spread" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "ephemera.componentSelector" . | nindent 12 }}
    - weight: 50
      podAffinityTerm:
        topologyKey: topology.kubernetes.io/zone
        labelSelector:
          matchLabels:
            {{- include "ephemera.componentSelector" . | nindent 12 }}
{{- end }}

{{/* Port of aws.endpoint when it names one (http://host:4566 -> 4566). */}}
{{- define "ephemera.awsEndpointPort" -}}
{{- with .Values.aws.endpoint }}
{{- $host := (urlParse .).host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- end }}
{{- end }}
{{- end }}

{{/* Egress rules of the NetworkPolicies: (dict "ctx" $ "aws" bool). */}}
{{- define "ephemera.egress" -}}
{{- $np := .ctx.Values.networkPolicy -}}
# DNS.
- ports:
    {{- range $np.dns.ports }}
    - {port: {{ . }}, protocol: UDP}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# The Kubernetes apiserver (its Service port and, after DNAT, the endpoint's).
- ports:
    {{- range $np.apiserver.ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with $np.apiserver.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if .aws }}
# AWS IAM and STS.
{{- $ports := list }}
{{- range $np.aws.ports }}
{{- $ports = append $ports (toString .) }}
{{- end }}
{{- $endpointPort := include "ephemera.awsEndpointPort" .ctx }}
{{- if and $endpointPort (not (has $endpointPort $ports)) }}
{{- $ports = append $ports $endpointPort }}
{{- end }}
- ports:
    {{- range $ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with $np.aws.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's IAM policy, as JSON. */}}
{{- define "ephemera.iamPolicy" -}}
{{- $p := .Values.aws.iamPolicy }}
{{- $account := default "*" .Values.aws.accountId }}
{{- $roles := list (printf "arn:%s:iam::%s:role%s*" .Values.aws.partition $account .Values.aws.rolePathRoot) }}
{{- $sets := printf "arn:%s:iam::%s:policy%sephemera-revoked-*" .Values.aws.partition $account .Values.aws.rolePathRoot }}
{{- $create := dict "Sid" "CreateRolesUnderOwnPath" "Effect" "Allow" "Action" (list "iam:CreateRole") "Resource" $roles }}
{{- with $p.permissionsBoundaryArns }}
{{- /* The boundaries' own permissions boundaries, or this cluster's revocation sets. */}}
{{- $_ := set $create "Condition" (dict "ArnLike" (dict "iam:PermissionsBoundary" (append . $sets))) }}
{{- end }}
{{- $manage := dict "Sid" "ManageOwnRoles" "Effect" "Allow" "Resource" $roles "Action" (list
  "iam:GetRole"
  "iam:UpdateAssumeRolePolicy"
  "iam:PutRolePolicy"
  "iam:ListRolePolicies"
  "iam:DeleteRolePolicy"
  "iam:ListAttachedRolePolicies"
  "iam:DetachRolePolicy"
  "iam:ListRoleTags"
  "iam:DeleteRole") }}
{{- $tag := dict "Sid" "TagOwnRoles" "Effect" "Allow" "Action" (list "iam:TagRole") "Resource" $roles "Condition" (dict "ForAllValues:StringLike" (dict "aws:TagKeys" (list "ephemera.dev/*"))) }}
{{- $attach := dict "Sid" "AttachManagedPolicies" "Effect" "Allow" "Action" (list "iam:AttachRolePolicy") "Resource" $roles }}
{{- with $p.attachablePolicyArns }}
{{- $_ := set $attach "Condition" (dict "ArnLike" (dict "iam:PolicyARN" .)) }}
{{- end }}
{{- $revocation := dict "Sid" "RevocationSets" "Effect" "Allow" "Resource" $sets "Action" (list
  "iam:CreatePolicy"
  "iam:CreatePolicyVersion"
  "iam:DeletePolicyVersion"
  "iam:ListPolicyVersions"
  "iam:GetPolicyVersion") }}
{{- $list := dict "Sid" "AccountWide" "Effect" "Allow" "Action" (list "iam:ListRoles" "iam:GetAccountSummary") "Resource" "*" }}
{{- toPrettyJson (dict "Version" "2012-10-17" "Statement" (list $create $tag $manage $attach $revocation $list)) }}
{{- end }}

{{/* host:port for a listen flag, IPv6 hosts bracketed: (list host port). */}}
{{- define "ephemera.hostPort" -}}
{{- $host := index . 0 }}
{{- if contains ":" $host }}
{{- printf "[%s]:%v" $host (index . 1) }}
{{- else }}
{{- printf "%s:%v" $host (index . 1) }}
{{- end }}
{{- end }}
